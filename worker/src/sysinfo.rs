//! What the worker tells the foreman about its machine: the CPU model at
//! join, and how busy the machine is in every heartbeat. Read from /proc on
//! Linux; elsewhere every value is empty or zero.

use wasmgrid_protocol::wire::Load;

/// The CPU's name as /proc/cpuinfo gives it (`model name` on x86, `Hardware`
/// or `cpu model` on some ARM and MIPS kernels); empty when unknown.
pub fn cpu_model() -> String {
    read_proc("/proc/cpuinfo")
        .map(|text| parse_cpu_model(&text))
        .unwrap_or_default()
}

/// Total memory of the machine in bytes; 0 when unknown.
pub fn total_memory() -> u64 {
    read_proc("/proc/meminfo")
        .and_then(|text| parse_meminfo(&text))
        .map_or(0, |m| m.total_bytes)
}

/// Samples machine load; each [`LoadSampler::sample`] reports the CPU time
/// used since the previous one.
#[derive(Debug, Default)]
pub struct LoadSampler {
    previous: Option<CpuTimes>,
}

impl LoadSampler {
    /// A sampler whose first sample covers the time since now.
    pub fn new() -> Self {
        LoadSampler {
            previous: read_proc("/proc/stat").and_then(|text| parse_cpu_times(&text)),
        }
    }

    /// The machine's load now; `running` is the worker's own count of tasks.
    pub fn sample(&mut self, running: u32) -> Load {
        let now = read_proc("/proc/stat").and_then(|text| parse_cpu_times(&text));
        let cpu_permille = match (self.previous, now) {
            (Some(before), Some(after)) => busy_permille(before, after),
            _ => 0,
        };
        if now.is_some() {
            self.previous = now;
        }
        let memory_used_bytes = read_proc("/proc/meminfo")
            .and_then(|text| parse_meminfo(&text))
            .map_or(0, |m| m.used_bytes());
        let worker_rss_bytes = read_proc("/proc/self/status")
            .and_then(|text| parse_vm_rss(&text))
            .unwrap_or(0);
        Load {
            cpu_permille,
            memory_used_bytes,
            worker_rss_bytes,
            running,
        }
    }
}

#[cfg(target_os = "linux")]
fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(not(target_os = "linux"))]
fn read_proc(_path: &str) -> Option<String> {
    None
}

fn parse_cpu_model(cpuinfo: &str) -> String {
    for key in ["model name", "Hardware", "cpu model"] {
        let found = cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key)
                .then(|| value.trim())
                .filter(|v| !v.is_empty())
        });
        if let Some(value) = found {
            return value.to_owned();
        }
    }
    String::new()
}

/// Cumulative CPU time of all cores, in clock ticks, from the `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // guest and guest_nice are already counted in user and nice.
    let counted = &fields[..fields.len().min(8)];
    let total: u64 = counted.iter().fold(0u64, |a, &b| a.saturating_add(b));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

fn busy_permille(before: CpuTimes, after: CpuTimes) -> u32 {
    let total = after.total.saturating_sub(before.total);
    let busy = after.busy.saturating_sub(before.busy).min(total);
    if total == 0 {
        return 0;
    }
    (busy.saturating_mul(1000) / total) as u32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemInfo {
    total_bytes: u64,
    available_bytes: Option<u64>,
    free_bytes: Option<u64>,
}

impl MemInfo {
    /// Total minus available (or minus free on kernels older than 3.14).
    fn used_bytes(&self) -> u64 {
        let available = self.available_bytes.or(self.free_bytes).unwrap_or(0);
        self.total_bytes.saturating_sub(available)
    }
}

fn parse_meminfo(meminfo: &str) -> Option<MemInfo> {
    Some(MemInfo {
        total_bytes: kib_field(meminfo, "MemTotal")?,
        available_bytes: kib_field(meminfo, "MemAvailable"),
        free_bytes: kib_field(meminfo, "MemFree"),
    })
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS")
}

/// A `Name:   1234 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key != name {
            return None;
        }
        let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
        model\t\t: 85\nmodel name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz\n\
        stepping\t: 7\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz\n";
    const ARM_CPUINFO: &str = "processor\t: 0\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd\n\
        CPU implementer\t: 0x41\n\nHardware\t: BCM2835\nRevision\t: c03111\n";

    #[test]
    fn cpu_model_from_model_name_or_hardware() {
        assert_eq!(
            parse_cpu_model(X86_CPUINFO),
            "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz"
        );
        assert_eq!(parse_cpu_model(ARM_CPUINFO), "BCM2835");
        assert_eq!(
            parse_cpu_model("system type\t: x\ncpu model\t: MIPS 24Kc V7.4\n"),
            "MIPS 24Kc V7.4"
        );
        assert_eq!(parse_cpu_model("processor : 0\nmodel name :\n"), "");
        assert_eq!(parse_cpu_model(""), "");
    }

    #[test]
    fn cpu_busy_is_the_delta_of_non_idle_time() {
        let before = parse_cpu_times(
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n",
        )
        .unwrap();
        assert_eq!(
            before,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        // 300 more ticks busy (user 200, system 100) out of 1000.
        let after = parse_cpu_times("cpu  300 0 150 1500 50 0 0 0 20 0\n").unwrap();
        assert_eq!(busy_permille(before, after), 300);
        // No time passed, or counters went backwards: nothing is claimed.
        assert_eq!(busy_permille(after, after), 0);
        assert_eq!(busy_permille(after, before), 0);
    }

    #[test]
    fn old_kernels_with_four_cpu_fields_parse() {
        assert_eq!(
            parse_cpu_times("cpu 1 2 3 4\n"),
            Some(CpuTimes { busy: 6, total: 10 })
        );
        assert_eq!(parse_cpu_times("cpu 1 2\n"), None);
        assert_eq!(parse_cpu_times("cpu 1 x 3 4\n"), None);
        assert_eq!(parse_cpu_times("intr 5\n"), None);
    }

    #[test]
    fn memory_used_is_total_minus_available() {
        let meminfo = "MemTotal:       16314588 kB\nMemFree:         1043212 kB\n\
            MemAvailable:    8157294 kB\nBuffers:          300000 kB\n";
        let info = parse_meminfo(meminfo).unwrap();
        assert_eq!(info.total_bytes, 16314588 * 1024);
        assert_eq!(info.used_bytes(), (16314588 - 8157294) * 1024);
        let old = parse_meminfo("MemTotal: 1000 kB\nMemFree: 400 kB\n").unwrap();
        assert_eq!(old.used_bytes(), 600 * 1024);
        assert_eq!(parse_meminfo("MemFree: 400 kB\n"), None);
    }

    #[test]
    fn rss_from_proc_self_status() {
        let status =
            "Name:\tworker\nVmPeak:\t  900000 kB\nVmRSS:\t   51200 kB\nRssAnon:\t 40000 kB\n";
        assert_eq!(parse_vm_rss(status), Some(51200 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn sampling_this_machine_does_not_fail() {
        let mut sampler = LoadSampler::new();
        let load = sampler.sample(3);
        assert_eq!(load.running, 3);
        assert!(load.cpu_permille <= 1000);
        if cfg!(target_os = "linux") {
            assert!(load.worker_rss_bytes > 0);
            assert!(load.memory_used_bytes > 0);
            assert!(total_memory() > 0);
        }
    }
}
