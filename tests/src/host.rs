//! How much CPU time the hypervisor gave to other guests while a benchmark
//! ran: figures measured on a busy host are slower, and this says by how much
//! to doubt them.

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
