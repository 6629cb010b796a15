//! What the proxies cost, read from procfs: CPU time (utime + stime of every thread, dead
//! ones included) and resident memory (VmRSS), sampled while a client runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How often RSS is sampled during a run.
const RSS_INTERVAL: Duration = Duration::from_millis(100);

/// `/proc/<pid>/comm`.
pub fn comm(pid: u32) -> Result<String> {
    Ok(fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("read /proc/{pid}/comm"))?
        .trim()
        .to_string())
}

/// utime + stime of the process (all its threads, also those that have exited), seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .with_context(|| format!("parse /proc/{pid}/stat"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses; fields after the last ')'
    // are plain. Field 3 (state) is the first of them, so utime (14) and stime (15) are the
    // 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// VmRSS in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status_field_kib(&status, "VmRSS:").with_context(|| format!("no VmRSS for pid {pid}"))
}

/// What a process holds: VmRSS split into anonymous and file-backed (mostly the binary's
/// own pages) memory, and its thread count.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub threads: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name| status_field_kib(&status, name).unwrap_or(0);
    Ok(Memory {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        threads: field("Threads:"),
    })
}

/// The sum of [`rss_kib`] over `pids`.
pub fn rss_kib_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&pid| rss_kib(pid)).sum()
}

fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `Max open files` soft and hard limits of a process, as /proc/<pid>/limits shows them.
pub fn nofile_limit(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            let mut words = line["Max open files".len()..].split_whitespace();
            Some(format!("{}/{}", words.next()?, words.next()?))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The whole machine's CPU time (all CPUs), seconds, from the first line of /proc/stat
/// (user, nice, system, idle, iowait, irq, softirq, steal, ...), read once for both figures.
struct HostCpu {
    /// User and system time. Interrupt time is left out: packet processing of the benchmark's
    /// own traffic lands there, and cgroup accounting does not see it.
    busy: f64,
    /// Time the hypervisor ran something else while this VM's vCPUs wanted to run. On a
    /// shared host it is what makes wake-ups slow and runs at different times disagree; 0 on
    /// bare metal.
    steal: f64,
}

impl HostCpu {
    fn read() -> Result<HostCpu> {
        let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let (busy, steal) = host_cpu_ticks(&stat).context("parse /proc/stat")?;
        let hz = clock_ticks_per_second();
        Ok(HostCpu {
            busy: busy as f64 / hz,
            steal: steal as f64 / hz,
        })
    }
}

/// (user + nice + system, steal) ticks of the all-CPU line.
fn host_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some((fields.get(..3)?.iter().sum(), *fields.get(7)?))
}

/// `usage_usec` of a cgroup v2 (every process below it, ever), seconds.
pub fn cgroup_usage_seconds(cgroup: &Path) -> Result<f64> {
    let path = cgroup.join("cpu.stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|us| us as f64 / 1e6)
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

/// CPU the rest of the machine used while the benchmark ran: everything outside the
/// testbed's cgroup (which holds the agents, stunnel, servers and clients).
pub struct Background {
    cgroup: PathBuf,
    host: HostCpu,
    ours: f64,
    at: Instant,
}

/// What ran on the machine besides a measured run, averaged over it, in vCPUs.
pub struct Interference {
    /// CPU used outside the testbed's cgroup.
    pub other_load: f64,
    /// CPU time the hypervisor withheld from this VM.
    pub steal: f64,
}

impl Background {
    pub fn start(cgroup: &Path) -> Result<Background> {
        Ok(Background {
            cgroup: cgroup.to_path_buf(),
            host: HostCpu::read()?,
            ours: cgroup_usage_seconds(cgroup)?,
            at: Instant::now(),
        })
    }

    /// The averages since `start` (other load never below 0: the two clocks it compares
    /// tick at different resolutions).
    pub fn finish(&self) -> Result<Interference> {
        let now = HostCpu::read()?;
        let (host, steal) = (now.busy - self.host.busy, now.steal - self.host.steal);
        let ours = cgroup_usage_seconds(&self.cgroup)? - self.ours;
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-3);
        Ok(Interference {
            other_load: ((host - ours) / elapsed).max(0.0),
            steal: (steal / elapsed).max(0.0),
        })
    }
}

/// Samples the summed RSS of some processes in the background; [`RssSampler::finish`]
/// returns the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = (!pids.is_empty()).then(|| {
            thread::spawn(move || {
                let mut peak = 0;
                loop {
                    if let Ok(rss) = rss_kib_of(&pids) {
                        peak = peak.max(rss);
                    }
                    if flag.load(Ordering::Relaxed) {
                        return peak;
                    }
                    thread::sleep(RSS_INTERVAL);
                }
            })
        });
        RssSampler { stop, handle }
    }

    /// The peak summed RSS in KiB (0 when there was nothing to sample).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "4242 (mesh agent (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1234 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        let status = "Name:\tmesh-agent\nVmHWM:\t  9000 kB\nVmRSS:\t  8123 kB\nThreads:\t7\n";
        assert_eq!(status_field_kib(status, "Threads:"), Some(7));
        assert_eq!(status_field_kib(status, "VmRSS:"), Some(8123));
        assert_eq!(status_field_kib(status, "VmSwap:"), None);
        let proc_stat = "cpu  100 5 50 9000 10 3 7 0 0 0\ncpu0 50 2 25 4500 5 1 3 0 0 0\n";
        assert_eq!(host_cpu_ticks(proc_stat).map(|t| t.0), Some(155));
        let with_steal = "cpu  100 5 50 9000 10 3 7 42 0 0\n";
        assert_eq!(host_cpu_ticks(with_steal).map(|t| t.1), Some(42));
        assert_eq!(host_cpu_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        let m = memory(pid).unwrap();
        assert!(m.threads >= 1 && m.anon_kib + m.file_kib <= m.rss_kib);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(nofile_limit(pid).contains('/'));
        let sampler = RssSampler::start(vec![pid]);
        thread::sleep(Duration::from_millis(20));
        assert!(sampler.finish() > 0);
    }
}
