//! `foreman`: runs the grid's coordinator (`serve`) and talks to it (`submit`,
//! `status`, `results`, `cancel`, `jobs`, `workers`, `drain`, `failures`,
//! `token`), and rotates its certificate (`cert rotate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wasmgrid_foreman::admin;
use wasmgrid_foreman::api::{JobOptions, OutputLimits};
use wasmgrid_foreman::client::{self, Client, SubmitOptions};
use wasmgrid_foreman::core::HealthPolicy;
use wasmgrid_foreman::model::Scheduler;
use wasmgrid_foreman::serve::{serve, ServeOptions};
use wasmgrid_foreman::store::{TokenKind, TokenRole};
use wasmgrid_foreman::tables::{self, ListFormat};
use wasmgrid_jobspec::SubmitLimits;
use wasmgrid_protocol::TaskLimits;
use wasmgrid_worker::cli_io::LogFormat;
use wasmgrid_worker::executor::SlotPriority;

#[derive(Parser)]
#[command(
    name = "foreman",
    version,
    about = "The wasmgrid foreman: jobs in, tasks out to workers, results back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: text for people, json for collectors.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// A client token for the REST API (default: the client-token file of
    /// ./wasmgrid-data when --foreman is on this machine).
    #[arg(long, env = "WASMGRID_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the foreman: QUIC for workers, REST for users, SQLite for everything.
    Serve {
        #[arg(long, default_value = client::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:9000")]
        quic: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8000")]
        http: SocketAddr,
        /// Also start and supervise this many workers on this machine; they
        /// share its cores as their slots.
        #[arg(long, default_value_t = 0)]
        local_workers: u32,
        /// The local workers' `--priority`: `low` or `idle` let this
        /// machine's own programs (and the foreman) go before their tasks.
        #[arg(long, value_enum, default_value_t = SlotPriority::Normal)]
        local_priority: SlotPriority,
        /// Largest job upload (module and args together), in MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        max_upload_mib: usize,
        #[command(flatten)]
        caps: CapArgs,
        /// Delete finished jobs (with their tasks, attempts and results) this
        /// long after they end: 30d, 12h, 90m or 45s. Kept for ever by default.
        #[arg(long, value_name = "AGE", value_parser = wasmgrid_foreman::retention::parse_duration)]
        retention: Option<std::time::Duration>,
        /// A worker silent this long is offline and its tasks are requeued.
        #[arg(long, value_name = "SECS", default_value_t = 15.0)]
        heartbeat_timeout: f64,
        /// For jobs that name none: fifo, round-robin, least-loaded, performance or priority.
        #[arg(long, value_name = "NAME", default_value = "fifo", value_parser = clap::value_parser!(Scheduler))]
        scheduler: Scheduler,
        /// Infrastructure failures (lost, timed out) within --cooldown-window
        /// that bench a worker for --cooldown (0: never).
        #[arg(long, value_name = "N", default_value_t = 3)]
        cooldown_after: u32,
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        cooldown_window: f64,
        #[arg(long, value_name = "SECS", default_value_t = 30.0)]
        cooldown: f64,
        /// Added to a task's timeout before the foreman gives up on its report.
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        lease_slack: f64,
        /// Reads need a client token even when --http is on loopback (beyond
        /// loopback they always do; changes always do).
        #[arg(long)]
        require_token_for_reads: bool,
        /// Let pages from this one origin (https://example.org) call the API
        /// from a browser (CORS); by default none may.
        #[arg(long, value_name = "ORIGIN")]
        cors_origin: Option<String>,
        /// Largest result JSON a task may return, in KiB (a longer one fails
        /// the task as ResultTooLarge): the default, and the most a job may ask.
        #[arg(long, value_name = "KIB", default_value_t = TaskLimits::DEFAULT_RESULT_BYTES / 1024,
              value_parser = clap::value_parser!(u32).range(1..=(64 * 1024)))]
        max_result_kib: u32,
        /// Most stdout (and stderr) a job may ask to keep per task, in KiB.
        #[arg(long, value_name = "KIB", default_value_t = TaskLimits::DEFAULT_OUTPUT_BYTES / 1024,
              value_parser = clap::value_parser!(u32).range(0..=(16 * 1024)))]
        max_output_kib: u32,
    },
    /// Submits a job and waits for its results (printed as a JSON array in argument order).
    Submit {
        module: PathBuf,
        args: PathBuf,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
        /// Per task (default: the foreman's, 10000000000 unless capped lower).
        #[arg(long)]
        fuel: Option<u64>,
        /// Per task (default: the foreman's, 256 unless capped lower).
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Per task (default: the foreman's, 60 unless capped lower).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[arg(long, default_value_t = 3)]
        retries: u32,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// fifo, round-robin, least-loaded, performance or priority (default: the foreman's).
        #[arg(long, value_name = "NAME", value_parser = clap::value_parser!(Scheduler))]
        scheduler: Option<Scheduler>,
        /// Keep the job queued until then: an RFC 3339 UTC time
        /// (2026-11-22T20:30:00Z) or from now (+90s, +5m, +1h30m).
        #[arg(long, value_name = "TIME", value_parser = client::parse_not_before)]
        not_before: Option<u64>,
        /// Retry deterministic failures (OutOfFuel, MemoryLimit, Trap, ...) too,
        /// within --retries, for guests that are not as deterministic as they should be.
        #[arg(long)]
        retry_deterministic: bool,
        /// Stdout (and stderr) kept per task, in KiB (default 64, at most the
        /// foreman's --max-output-kib).
        #[arg(long, value_name = "KIB")]
        output_kib: Option<u32>,
        /// Largest result per task, in KiB (default and at most the
        /// foreman's --max-result-kib).
        #[arg(long, value_name = "KIB")]
        result_kib: Option<u32>,
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print the job id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// A job's state and counts.
    Status {
        job: u64,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
        /// Text for people or JSON for scripts.
        #[arg(long, value_enum, default_value_t = ListFormat::Auto)]
        format: ListFormat,
    },
    /// A job's results and failures.
    Results {
        job: u64,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
    },
    /// Cancels a job.
    Cancel {
        job: u64,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
    },
    /// Deletes finished jobs with their tasks, attempts and results (a running job must be cancelled first).
    Delete {
        #[arg(required = true)]
        jobs: Vec<u64>,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
    },
    /// Lists jobs, newest first.
    Jobs {
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
        /// Text for people or JSON for scripts.
        #[arg(long, value_enum, default_value_t = ListFormat::Auto)]
        format: ListFormat,
    },
    /// Lists workers; with --wait N, first blocks until N are online (for scripts).
    Workers {
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
        /// Text for people or JSON for scripts.
        #[arg(long, value_enum, default_value_t = ListFormat::Auto)]
        format: ListFormat,
        #[arg(long, value_name = "N")]
        wait: Option<usize>,
        /// Give up waiting after this long (exit code 1).
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Asks a connected worker to finish its running tasks, hand back the rest and leave.
    Drain {
        worker: u64,
        /// How long its running tasks may take before they are cancelled (default 30).
        #[arg(long, value_name = "SECS")]
        grace: Option<f64>,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
    },
    /// A worker's failed attempts, newest first.
    Failures {
        worker: u64,
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u64,
        #[arg(long, default_value = DEFAULT_FOREMAN)]
        foreman: String,
    },
    /// Join tokens (workers) and client tokens (REST API): create, list, revoke.
    Token {
        #[command(subcommand)]
        action: TokenAction,
        #[arg(long, default_value = DEFAULT_FOREMAN, global = true)]
        foreman: String,
    },
    /// The foreman's TLS certificate.
    Cert {
        #[command(subcommand)]
        action: CertAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Makes a token and prints it (the only time it is shown).
    Create {
        /// worker (joins workers) or client (calls the REST API).
        #[arg(long, default_value = "worker", value_parser = clap::value_parser!(TokenKind))]
        kind: TokenKind,
        #[arg(long, default_value = "")]
        name: String,
        /// Refused from then on: an RFC 3339 UTC time or from now (+30d, +12h).
        #[arg(long, value_name = "TIME", value_parser = client::parse_not_before)]
        expires: Option<u64>,
        /// A client token's role: admin (everything), user (submits jobs and
        /// cancels its own; the default) or read (reads only).
        #[arg(long, value_parser = clap::value_parser!(TokenRole))]
        role: Option<TokenRole>,
    },
    /// Lists tokens (never their secrets) and the certificate fingerprint join tokens pair with.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token: calls with it are refused, workers that joined with it are disconnected.
    Revoke { id: u64 },
}

#[derive(Subcommand)]
enum CertAction {
    /// With the foreman stopped: a new key and certificate (the old pair kept as
    /// *.previous); prints the new fingerprint.
    Rotate {
        #[arg(long, default_value = client::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// `foreman serve`'s caps on each job, whatever it asks.
#[derive(clap::Args)]
struct CapArgs {
    /// Largest module a job may have (its wasm bytes), in MiB.
    #[arg(long, value_name = "MIB", default_value_t = SubmitLimits::DEFAULT_MAX_MODULE_MIB)]
    max_module_mib: u64,
    /// Largest args JSON a job may have (all tasks together), in MiB.
    #[arg(long, value_name = "MIB", default_value_t = SubmitLimits::DEFAULT_MAX_ARGS_MIB)]
    max_args_mib: u64,
    /// Most tasks in one job.
    #[arg(long, value_name = "N", default_value_t = SubmitLimits::DEFAULT_MAX_TASKS_PER_JOB)]
    max_tasks_per_job: u64,
    /// Most fuel a job may give each task (a job asking none gets the
    /// default, lowered to this).
    #[arg(long, value_name = "N", default_value_t = SubmitLimits::DEFAULT_MAX_FUEL)]
    max_fuel: u64,
    /// Most memory a job may give each task, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = SubmitLimits::DEFAULT_MAX_MEMORY_MIB)]
    max_memory_mib: u64,
    /// Longest timeout a job may give each task, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = SubmitLimits::DEFAULT_MAX_TIMEOUT_SECS)]
    max_timeout: f64,
    /// Most jobs one client token may have queued or running at once.
    #[arg(long, value_name = "N", default_value_t = SubmitLimits::DEFAULT_MAX_UNFINISHED_JOBS_PER_TOKEN)]
    max_queued_jobs_per_token: u64,
}

impl CapArgs {
    fn to_limits(&self) -> anyhow::Result<SubmitLimits> {
        anyhow::ensure!(
            self.max_timeout.is_finite() && self.max_timeout > 0.0,
            "--max-timeout must be a positive number of seconds"
        );
        let bytes = |name: &str, mib: u64| -> anyhow::Result<u64> {
            mib.checked_mul(1 << 20)
                .with_context(|| format!("--{name} is too large"))
        };
        bytes("max-memory-mib", self.max_memory_mib)?;
        Ok(SubmitLimits {
            max_module_bytes: bytes("max-module-mib", self.max_module_mib)?,
            max_args_bytes: bytes("max-args-mib", self.max_args_mib)?,
            max_tasks_per_job: self.max_tasks_per_job,
            max_fuel: self.max_fuel,
            max_memory_mib: self.max_memory_mib,
            max_timeout_secs: self.max_timeout,
            max_unfinished_jobs_per_token: self.max_queued_jobs_per_token,
        })
    }
}

const DEFAULT_FOREMAN: &str = "http://127.0.0.1:8000";

fn main() -> ExitCode {
    let cli = Cli::parse();
    wasmgrid_worker::cli_io::init_logging("info", cli.log_format);
    match run(cli.command, cli.token) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command, token: Option<String>) -> anyhow::Result<ExitCode> {
    let connect = |foreman: &str| Client::for_cli(foreman, token.clone());
    match command {
        Command::Serve {
            data_dir,
            quic,
            http,
            local_workers,
            local_priority,
            max_upload_mib,
            caps,
            retention,
            heartbeat_timeout,
            scheduler,
            cooldown_after,
            cooldown_window,
            cooldown,
            lease_slack,
            require_token_for_reads,
            cors_origin,
            max_result_kib,
            max_output_kib,
        } => {
            anyhow::ensure!(
                heartbeat_timeout.is_finite() && heartbeat_timeout >= 0.05,
                "--heartbeat-timeout must be at least 0.05 seconds"
            );
            let millis = |name: &str, secs: f64| -> anyhow::Result<u64> {
                anyhow::ensure!(
                    secs.is_finite() && secs >= 0.0,
                    "--{name} must be a number of seconds, at least 0"
                );
                Ok((secs * 1000.0) as u64)
            };
            let submit_limits = caps.to_limits()?;
            let health = HealthPolicy {
                lease_slack_ms: millis("lease-slack", lease_slack)?,
                cooldown_after,
                cooldown_window_ms: millis("cooldown-window", cooldown_window)?,
                cooldown_ms: millis("cooldown", cooldown)?,
            };
            // One thread runs the API, the core and QUIC: their work is short, and on
            // a small machine handing it between threads costs more than it does
            // (wakeups are most of a round trip). Validation and large reads go
            // to the blocking pool; SQLite writes have their own thread.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(ServeOptions {
                data_dir,
                quic,
                http,
                local_workers,
                local_priority,
                max_upload_bytes: max_upload_mib.saturating_mul(1 << 20),
                submit_limits,
                heartbeat_timeout: std::time::Duration::from_secs_f64(heartbeat_timeout),
                default_scheduler: scheduler,
                health,
                require_token_for_reads,
                cors_origin,
                output_limits: OutputLimits {
                    result_bytes: max_result_kib * 1024,
                    max_output_bytes: max_output_kib * 1024,
                },
                retention,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            module,
            args,
            foreman,
            fuel,
            memory,
            timeout,
            retries,
            priority,
            scheduler,
            not_before,
            retry_deterministic,
            output_kib,
            result_kib,
            output,
            detach,
        } => {
            let job = JobOptions {
                fuel,
                memory_mib: memory,
                timeout_secs: timeout,
                retries,
                priority,
                scheduler,
                not_before_ms: not_before,
                retry_deterministic,
                output_kib,
                result_kib,
            };
            client::submit(
                &connect(&foreman),
                SubmitOptions {
                    module,
                    args,
                    job,
                    output,
                    detach,
                },
            )
        }
        Command::Status {
            job,
            foreman,
            format,
        } => format.print(
            &connect(&foreman).get(&format!("/api/jobs/{job}"))?,
            tables::job,
        ),
        Command::Results { job, foreman } => {
            client::print_json(&connect(&foreman).get(&format!("/api/jobs/{job}/results"))?)
        }
        Command::Cancel { job, foreman } => client::print_json(
            &connect(&foreman).post(&format!("/api/jobs/{job}/cancel"), &serde_json::json!({}))?,
        ),
        Command::Delete { jobs, foreman } => client::delete(&connect(&foreman), &jobs),
        Command::Jobs { foreman, format } => {
            format.print(&connect(&foreman).get("/api/jobs")?, tables::jobs)
        }
        Command::Workers {
            foreman,
            format,
            wait,
            timeout,
        } => match client::workers(&connect(&foreman), wait, timeout)? {
            Some(workers) => format.print(&workers, tables::workers),
            None => Ok(ExitCode::FAILURE),
        },
        Command::Drain {
            worker,
            grace,
            foreman,
        } => {
            let body = match grace {
                Some(secs) => serde_json::json!({ "grace_secs": secs }),
                None => serde_json::json!({}),
            };
            client::print_json(
                &connect(&foreman).post(&format!("/api/workers/{worker}/drain"), &body)?,
            )
        }
        Command::Token { action, foreman } => {
            let client = connect(&foreman);
            match action {
                TokenAction::Create {
                    kind,
                    name,
                    expires,
                    role,
                } => admin::create(&client, kind, role, &name, expires),
                TokenAction::List { json } => admin::list(&client, json),
                TokenAction::Revoke { id } => admin::revoke(&client, id),
            }
        }
        Command::Cert {
            action: CertAction::Rotate { data_dir },
        } => admin::rotate(&data_dir),
        Command::Failures {
            worker,
            limit,
            foreman,
        } => client::print_json(
            &connect(&foreman).get(&format!("/api/workers/{worker}/failures?limit={limit}"))?,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulers_and_times_are_checked_when_parsed() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.command);
        match parse(&["foreman", "serve"]) {
            Ok(Command::Serve { scheduler, .. }) => assert_eq!(scheduler, Scheduler::Fifo),
            _ => panic!("serve without --scheduler"),
        }
        match parse(&["foreman", "serve", "--scheduler", "least-loaded"]) {
            Ok(Command::Serve { scheduler, .. }) => assert_eq!(scheduler, Scheduler::LeastLoaded),
            _ => panic!("serve --scheduler least-loaded"),
        }
        match parse(&["foreman", "serve"]) {
            Ok(Command::Serve { caps, .. }) => {
                assert_eq!(caps.to_limits().unwrap(), SubmitLimits::default())
            }
            _ => panic!("serve without caps"),
        }
        match parse(&[
            "foreman",
            "serve",
            "--max-memory-mib",
            "64",
            "--max-timeout",
            "2.5",
        ]) {
            Ok(Command::Serve { caps, .. }) => {
                let limits = caps.to_limits().unwrap();
                assert_eq!((limits.max_memory_mib, limits.max_timeout_secs), (64, 2.5));
            }
            _ => panic!("serve with caps"),
        }
        for flags in [
            &["--max-timeout", "0"][..],
            &["--max-timeout", "NaN"],
            &["--max-module-mib", "18446744073709551615"],
            &["--max-memory-mib", "18446744073709551615"],
        ] {
            let args = [&["foreman", "serve"][..], flags].concat();
            match parse(&args) {
                Ok(Command::Serve { caps, .. }) => assert!(caps.to_limits().is_err(), "{flags:?}"),
                _ => panic!("{flags:?} did not parse"),
            }
        }
        match parse(&["foreman", "submit", "m.wasm", "a.json"]) {
            Ok(Command::Submit {
                scheduler,
                not_before,
                ..
            }) => assert_eq!((scheduler, not_before), (None, None)),
            _ => panic!("plain submit"),
        }
        match parse(&[
            "foreman",
            "submit",
            "m.wasm",
            "a.json",
            "--scheduler",
            "priority",
            "--not-before",
            "2026-11-22T20:30:00Z",
        ]) {
            Ok(Command::Submit {
                scheduler,
                not_before,
                ..
            }) => assert_eq!(
                (scheduler, not_before),
                (Some(Scheduler::Priority), Some(1_795_379_400_000))
            ),
            _ => panic!("submit with options"),
        }
        for args in [
            &["foreman", "serve", "--scheduler", "fastest"][..],
            &["foreman", "submit", "m", "a", "--scheduler", "fastest"],
            &["foreman", "submit", "m", "a", "--not-before", "soon"],
        ] {
            let error = parse(args).err().expect("refused").to_string();
            assert!(
                error.contains("unknown scheduler") || error.contains("is not a time"),
                "{error}"
            );
        }
        assert!(matches!(
            parse(&["foreman", "drain", "3", "--grace", "2.5"]),
            Ok(Command::Drain { worker: 3, grace: Some(g), .. }) if g == 2.5
        ));
        assert!(matches!(
            parse(&["foreman", "failures", "3"]),
            Ok(Command::Failures {
                worker: 3,
                limit: 100,
                ..
            })
        ));
    }
}
