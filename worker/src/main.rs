//! `worker`: runs wasmgrid tasks. `worker exec` runs a whole job on this machine.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use wasmgrid_protocol::TaskLimits;
use wasmgrid_worker::cli_io::LogFormat;
use wasmgrid_worker::exec::{run_job, split_args};
use wasmgrid_worker::executor::{Executor, ExecutorOptions, Metering, SlotPriority};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Runs wasmgrid tasks in a wasm sandbox: joins a foreman, or runs a job here with `worker exec`"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    join: JoinArgs,
    /// How log lines on stderr look: text for people, json for collectors.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Args)]
struct JoinArgs {
    /// The foreman's QUIC address, as printed by `foreman serve`.
    #[arg(long)]
    foreman: Option<std::net::SocketAddr>,
    /// The join token printed by `foreman serve` or `foreman token create`:
    /// wgw_ID_SECRET:FINGERPRINT (the secret, and the certificate fingerprint to pin).
    #[arg(long)]
    token: Option<String>,
    /// Tasks run at once; defaults to the number of cores.
    #[arg(long)]
    slots: Option<u32>,
    /// How this worker shows up at the foreman; defaults to the hostname.
    #[arg(long)]
    name: Option<String>,
    /// Where compiled modules are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// What the compiled modules in the cache directory may take, in MiB;
    /// the least recently used are deleted past it.
    #[arg(long, value_name = "MIB", default_value_t = wasmgrid_worker::executor::DEFAULT_CACHE_MAX_BYTES >> 20)]
    cache_max_mib: u64,
    /// Cap on each slot's CPU time, in percent (1-100), BOINC style: a slot
    /// sleeps between short stretches of running. Wall-clock task timeouts
    /// still count real time, sleeps included.
    #[arg(long, value_name = "PERCENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    cpu_limit: u32,
    /// On SIGTERM, how long running tasks get to finish (unstarted ones are
    /// handed back at once); then they are cancelled. A second SIGTERM leaves at once.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    drain_grace: f64,
    /// How tasks share this machine with its owner's programs: `normal`;
    /// `low` (nice 19); `idle`, only on CPU time nothing else wants (Linux
    /// SCHED_IDLE; elsewhere as `low`). The worker's own threads keep
    /// theirs, so it stays responsive to the foreman.
    #[arg(long, value_enum, default_value_t = SlotPriority::Normal)]
    priority: SlotPriority,
    /// Where this worker's status API and dashboard listen (`/dashboard`);
    /// port 0 picks a free one (printed as `API http://ADDR`). A port in use
    /// only warns.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8001")]
    api: std::net::SocketAddr,
    /// Serve no status API.
    #[arg(long, conflicts_with = "api")]
    no_api: bool,
    /// Exit when the process that started this worker exits (set by `foreman serve --local-workers`).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every task of a job on this machine and prints the results as a
    /// JSON array in argument order.
    Exec(ExecArgs),
}

#[derive(Args)]
struct ExecArgs {
    /// The task: a wasm component of the wasmgrid:task world.
    module: PathBuf,
    /// A JSON array with one argument set per task.
    args: PathBuf,
    /// Tasks run at once (threads); defaults to the number of cores.
    #[arg(long)]
    slots: Option<usize>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Where compiled modules are cached between runs.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the on-disk module cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Cap on each slot's CPU time, in percent (1-100), BOINC style: a slot
    /// sleeps between short stretches of running. Wall-clock task timeouts
    /// still count real time, sleeps included.
    #[arg(long, value_name = "PERCENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    cpu_limit: u32,
    /// Write the results here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Also write every task's full report (outcome, fuel, timings, output) as JSON here.
    #[arg(long)]
    reports: Option<PathBuf>,
}

#[derive(Args)]
struct LimitArgs {
    /// Fuel per task (about one unit per wasm instruction). 0: no fuel
    /// metering, so tasks run faster (primes: ~1.4×) and report no fuel;
    /// only the wall-clock limit stops a runaway.
    #[arg(long, default_value_t = TaskLimits::DEFAULT_FUEL)]
    fuel: u64,
    /// Linear memory per task, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = TaskLimits::DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Wall-clock limit per task, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = TaskLimits::DEFAULT_TIMEOUT_SECS as f64)]
    timeout: f64,
}

impl LimitArgs {
    fn to_limits(&self) -> anyhow::Result<TaskLimits> {
        anyhow::ensure!(
            self.timeout.is_finite() && self.timeout > 0.0,
            "--timeout must be a positive number of seconds"
        );
        Ok(TaskLimits {
            fuel: self.fuel,
            memory_bytes: self
                .memory
                .checked_mul(1 << 20)
                .context("--memory is too large")?,
            timeout_ms: (self.timeout * 1000.0).ceil() as u64,
            output_bytes: TaskLimits::DEFAULT_OUTPUT_BYTES,
            result_bytes: TaskLimits::DEFAULT_RESULT_BYTES,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wasmgrid_worker::cli_io::init_logging("info", cli.log_format);
    let result = match cli.command {
        Some(Command::Exec(args)) => exec(args),
        None => join(cli.join),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn join(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let (Some(foreman), Some(token)) = (args.foreman, args.token) else {
        anyhow::bail!("give --foreman ADDR and --token TOKEN (printed by `foreman serve`), or use `worker exec`");
    };
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
        .clamp(1, wasmgrid_protocol::wire::MAX_SLOTS);
    let name = args.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "worker".into())
    });
    let cache_dir = args
        .cache_dir
        .or_else(|| dirs::cache_dir().map(|d| d.join("wasmgrid").join("modules")));
    anyhow::ensure!(
        args.drain_grace.is_finite() && args.drain_grace >= 0.0,
        "--drain-grace must be a number of seconds, 0 or more"
    );
    let drain_grace = std::time::Duration::try_from_secs_f64(args.drain_grace)
        .context("--drain-grace is too large")?;
    if args.exit_with_parent {
        exit_when_orphaned();
    }
    // Tasks run on their own slot threads; the runtime only moves messages,
    // and one thread does that without waking another for each task.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(wasmgrid_worker::join::run(
        wasmgrid_worker::join::JoinOptions {
            foreman,
            token,
            slots,
            name,
            cache_dir,
            cache_max_bytes: args.cache_max_mib.saturating_mul(1 << 20),
            cpu_limit_percent: args.cpu_limit,
            drain_grace,
            api: (!args.no_api).then_some(args.api),
            priority: args.priority,
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// A supervised worker must not outlive its supervisor, even one killed with SIGKILL.
fn exit_when_orphaned() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                tracing::info!("the supervising foreman is gone; exiting");
                std::process::exit(0);
            }
        });
    }
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let limits = args.limits.to_limits()?;
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read the module {}", args.module.display()))?;
    let args_text = std::fs::read_to_string(&args.args)
        .with_context(|| format!("cannot read the arguments {}", args.args.display()))?;
    let task_args = split_args(&args_text).with_context(|| args.args.display().to_string())?;
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir
            .or_else(|| dirs::cache_dir().map(|d| d.join("wasmgrid").join("modules")))
    };
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let executor = Arc::new(Executor::with_options(ExecutorOptions {
        cache_dir,
        concurrency: u32::try_from(slots).context("--slots is too large")?,
        cpu_limit_percent: args.cpu_limit,
        metering: if limits.fuel == 0 {
            Metering::WallClockOnly
        } else {
            Metering::Fuel
        },
        ..ExecutorOptions::default()
    })?);
    let progress = std::io::stderr().is_terminal();
    let run = run_job(executor, &wasm, &task_args, limits, slots, progress)
        .map_err(|failure| anyhow::anyhow!("{}: {failure}", args.module.display()))?;

    wasmgrid_worker::cli_io::write_results(run.results_json(), args.output.as_deref())?;
    if let Some(path) = &args.reports {
        let json = serde_json::to_vec(&run.reports)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("{}", run.summary(10));
    Ok(if run.all_succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("worker").chain(args.iter().copied()))
    }

    #[test]
    fn the_api_listens_on_8001_unless_told_otherwise() {
        let cli = parse(&["--foreman", "127.0.0.1:9000", "--token", "a:b"]).unwrap();
        assert_eq!(cli.join.api, "127.0.0.1:8001".parse().unwrap());
        assert!(!cli.join.no_api);
        assert_eq!(cli.log_format, LogFormat::Text);

        let cli = parse(&["--api", "127.0.0.1:0"]).unwrap();
        assert_eq!(cli.join.api, "127.0.0.1:0".parse().unwrap());
        assert!(parse(&["--no-api"]).unwrap().join.no_api);
        assert!(parse(&["--api", "127.0.0.1:0", "--no-api"]).is_err());
        assert!(parse(&["--api", "nowhere"]).is_err());
    }

    #[test]
    fn log_format_goes_anywhere() {
        assert_eq!(
            parse(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        let cli = parse(&["exec", "m.wasm", "a.json", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(matches!(cli.command, Some(Command::Exec(_))));
        assert!(parse(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn exec_takes_no_api() {
        assert!(parse(&["exec", "m.wasm", "a.json", "--api", "127.0.0.1:0"]).is_err());
    }
}
