//! How much CPU time the hypervisor gave to other guests while a benchmark
//! ran (figures measured on a busy host are slower, and this says by how much
//! to doubt them), how much our own processes' threads used, and how they
//! are scheduled.

use std::collections::HashMap;
use std::time::Duration;

/// CPU time counters at a start point, from `/proc/stat`.
pub struct StealMeter {
    start: Option<(u64, u64)>,
}

impl StealMeter {
    pub fn start() -> Self {
        StealMeter { start: read() }
    }

    /// Steal since `start`, in percent of all CPU time; `None` off Linux.
    pub fn percent(&self) -> Option<f64> {
        let (steal0, total0) = self.start?;
        let (steal1, total1) = read()?;
        let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
        Some(100.0 * steal1.saturating_sub(steal0) as f64 / total as f64)
    }

    /// A line for a benchmark's table caption.
    pub fn describe(&self) -> String {
        match self.percent() {
            Some(p) => format!("host steal meanwhile: {p:.1}% of CPU time"),
            None => "host steal meanwhile: unknown".to_owned(),
        }
    }
}

/// (steal, total) jiffies over all CPUs.
fn read() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let steal = *fields.get(7)?;
    Some((steal, fields.iter().sum()))
}

/// CPU time the threads of some processes have run, split into tasks (the
/// workers' slot threads) and everything else (the control plane): a
/// measure of overhead that the host's speed swings do not blur.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCpu {
    pub tasks: Duration,
    pub control: Duration,
}

impl std::ops::AddAssign for ThreadCpu {
    fn add_assign(&mut self, other: ThreadCpu) {
        self.tasks += other.tasks;
        self.control += other.control;
    }
}

/// Each live thread's CPU time so far, by thread id, and whether it is a slot.
#[derive(Debug, Clone, Default)]
pub struct ThreadTimes(HashMap<u32, (bool, u64)>);

impl ThreadTimes {
    /// Every thread of `pids` alive now; empty off Linux.
    pub fn of(pids: &[u32]) -> ThreadTimes {
        let mut times = HashMap::new();
        for pid in pids {
            let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for thread in threads.flatten() {
                let Some(tid) = thread.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let path = thread.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                // The first field of schedstat: nanoseconds on a CPU.
                let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                else {
                    continue;
                };
                times.insert(tid, (comm.starts_with("wasmgrid-slot"), ns));
            }
        }
        ThreadTimes(times)
    }

    /// What ran since `earlier`, thread by thread: a thread that has exited
    /// meanwhile (an idle blocking-pool thread, say) takes its whole past
    /// with it, so sums of the two would not do.
    pub fn since(&self, earlier: &ThreadTimes) -> ThreadCpu {
        let mut cpu = ThreadCpu::default();
        for (tid, &(slot, ns)) in &self.0 {
            let before = earlier.0.get(tid).map_or(0, |&(_, ns)| ns);
            let ran = Duration::from_nanos(ns.saturating_sub(before));
            if slot {
                cpu.tasks += ran;
            } else {
                cpu.control += ran;
            }
        }
        cpu
    }
}

/// Each thread of process `pid`: whether it is a slot thread, and its
/// scheduling policy (field 41 of /proc/PID/task/TID/stat).
#[cfg(target_os = "linux")]
pub fn slot_policies(pid: u32) -> Vec<(bool, u32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            // The fields after the command name, which is in parentheses, start at 3.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let policy = fields.get(41 - 3)?.parse().ok()?;
            Some((comm.starts_with("wasmgrid-slot"), policy))
        })
        .collect()
}

/// The processes whose parent is `pid` (field 4 of /proc/PID/stat).
#[cfg(target_os = "linux")]
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let parent: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
}
