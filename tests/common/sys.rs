//! What benches read of the kernel about themselves and the processes they start: CPU time
//! per thread and per process, resident memory, CPU affinity, descriptor limits.

#![allow(unsafe_code)]

/// The calling thread's kernel id.
pub fn this_thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// The first field of a schedstat file: CPU time on the clock, in nanoseconds.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time of thread `tid` of this process, in nanoseconds (0 once it is gone).
pub fn thread_cpu_ns(tid: u32) -> u64 {
    schedstat_ns(&format!("/proc/self/task/{tid}/schedstat")).unwrap_or(0)
}

/// CPU time of every thread of process `pid`, in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| schedstat_ns(t.ok()?.path().join("schedstat").to_str()?))
        .sum()
}

/// Resident memory of process `pid`, in KiB (0 once it is gone).
pub fn rss_kb(pid: u32) -> f64 {
    vm_rss_kb(&format!("/proc/{pid}/status"))
}

/// Resident memory of this process, in KiB.
pub fn own_rss_kb() -> f64 {
    vm_rss_kb("/proc/self/status")
}

fn vm_rss_kb(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Lets the calling thread run on `cpus` only.
pub fn pin_to(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// Lifts this process's soft limit on open descriptors to the hard one.
pub fn raise_fd_limit() {
    // SAFETY: rlimit is plain data, read and written by the kernel for this process.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// Open file descriptors of process `pid` (0 once it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Threads of process `pid` (0 once it is gone).
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}
