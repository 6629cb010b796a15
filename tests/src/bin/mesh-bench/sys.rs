//! Process limits and waiting for a stop request.

use std::io::Read;

use anyhow::{Result, bail};

/// Raises RLIMIT_NOFILE so that at least `wanted` descriptors can be open: the soft limit up
/// to the hard one, and as root the hard one too (up to `fs.nr_open`). Returns the new soft
/// limit; fails, saying by how much, when `wanted` cannot be had.
pub fn raise_nofile(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    if limit.rlim_max < wanted {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(limit.rlim_max);
        // Only root may raise the hard limit; otherwise this stays as it is.
        limit.rlim_max = limit.rlim_max.max(wanted.min(nr_open));
    }
    limit.rlim_cur = wanted.min(limit.rlim_max);
    // SAFETY: setrlimit reads one rlimit we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        limit.rlim_max = 0;
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        limit.rlim_cur = wanted.min(limit.rlim_max);
        // SAFETY: as above; raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    if limit.rlim_cur < wanted {
        bail!(
            "RLIMIT_NOFILE: {wanted} descriptors wanted, the hard limit allows {} (run as root or raise it)",
            limit.rlim_cur
        );
    }
    Ok(limit.rlim_cur)
}

/// SIGTERM, SIGINT and SIGHUP, blocked by [`block_stop_signals`] and awaited by
/// [`wait_for_stop`].
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the stop signals in the calling thread, so that they stay pending for
/// [`wait_for_stop`] instead of killing the process. Call it before spawning threads: they
/// inherit the mask.
pub fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: changes only this thread's signal mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits until standard input reaches EOF (the parent closed the pipe or died) or a stop
/// signal arrives; returns what it was.
pub fn wait_for_stop() -> &'static str {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        // SAFETY: sends SIGTERM to this process, where it is blocked and so stays pending
        // for sigwait below.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let set = stop_signals();
    let mut signal = 0;
    // SAFETY: waits for one of the blocked signals in `set`.
    unsafe { libc::sigwait(&set, &mut signal) };
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "SIGTERM or end of input",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn raises_the_soft_limit_within_the_hard_one() {
        let current = super::raise_nofile(1).unwrap();
        assert!(current >= 1);
    }
}
