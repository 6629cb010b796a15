//! Monotonic nanoseconds and precise absolute sleeps for pacing requests.
//!
//! tokio's timer wheel has a 1 ms resolution: at 2,000 requests/s (one every 500 us) it would
//! send requests in bursts and add up to a millisecond of its own to every latency measured
//! from the intended send time. `clock_nanosleep(TIMER_ABSTIME)` with a 1 ns timer slack
//! (the default slack is 50 us) wakes a thread within a few microseconds of the schedule.

/// CLOCK_MONOTONIC in nanoseconds (the clock `std::time::Instant` uses on Linux).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until CLOCK_MONOTONIC reaches `deadline_ns` (returns at once if it has).
pub fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: an absolute sleep on a timespec we own; no remainder is requested.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Makes this thread's timed sleeps precise to the nanosecond instead of the default 50 us
/// slack. Per thread: every pacing thread calls it.
pub fn precise_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_deadline() {
        precise_timer_slack();
        let start = now_ns();
        sleep_until(start + 2_000_000);
        let woke = now_ns();
        assert!(woke >= start + 2_000_000);
        // Already past: returns at once.
        sleep_until(start);
        assert!(now_ns() - woke < 1_000_000_000);
    }
}
